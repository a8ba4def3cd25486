"""What every technique shares: validation, numerics, parameter paths and state lookup."""
