import sys

if "--quality" in sys.argv[1:]:  # the quality benchmark (benchmarks/quality/run.py)
  from benchmarks.quality.run import main as quality

  quality([arg for arg in sys.argv[1:] if arg != "--quality"])
else:
  from benchmarks.run import main

  main()
