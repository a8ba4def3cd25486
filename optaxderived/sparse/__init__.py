"""Row-sparse gradients for embedding tables: the gradient at the looked-up rows only.

``od.lazy`` (at the package root) updates only those rows of the params and the optimizer
state; the names here make and apply such gradients::

  grad_fn = od.sparse.row_sparse_grad(loss_fn, table="embed")
  loss, grads = grad_fn(params, ids, batch)          # grads["embed"] is a RowSparse
  updates, state = od.lazy(optax.adam(1e-3)).update(grads, state, params)
  params = od.sparse.apply_updates(params, updates)
"""

from __future__ import annotations

from optaxderived.sparse._row_sparse import RowSparse
from optaxderived.sparse._row_sparse import apply_updates
from optaxderived.sparse._row_sparse import row_sparse_grad

__all__ = (
  "RowSparse",
  "apply_updates",
  "row_sparse_grad",
)
