import pytest

from optaxderived import demo

STEPS = 4


# Two runs of a few steps cover every row; apart, pytest -n runs them side by side.
GROUPS = [("accumulation", "lookahead", "lazy", "clipping", "paths"), ("derive", "eg", "ode")]


def _rows_of(families):
  rows = [name for name, row in demo.ROWS.items() if row.family in families]
  baselines = {demo.ROWS[name].baseline for name in rows}
  return [name for name in demo.ROWS if name in baselines or name in rows]


def test_the_groups_cover_every_row():
  assert [f for group in GROUPS for f in group] == list(demo.FAMILIES)
  assert {name for group in GROUPS for name in _rows_of(group)} == set(demo.ROWS)


@pytest.mark.parametrize("families", GROUPS, ids=lambda group: "+".join(group))
def test_the_demo_trains_prints_its_table_and_plots_a_panel_per_family(
  families, tmp_path, capsys
):
  names = _rows_of(families)
  results = demo.main(
    ["--steps", str(STEPS), "--optimizers", ",".join(names), "--out", str(tmp_path)]
  )
  out = capsys.readouterr().out
  assert [r["name"] for r in results] == names

  # Real updates: one per batch of 128, but for accumulate's micro-batches and rk23.
  for r in results:
    assert r["calls"] == STEPS * demo.BATCH // demo.ROWS[r["name"]].batch_size
    if r["name"] == "accumulate":  # 8 micro-batches of 16 make one update
      assert r["real_updates"] == STEPS
    elif r["name"] == "rk23":  # a rejected step leaves the params
      assert 0 < r["real_updates"] <= r["calls"]
    else:
      assert r["real_updates"] == r["calls"], r["name"]

  # The table: the documented columns in order, a line per row, the legend under it.
  assert demo.COLUMNS == (
    "optimizer",
    "baseline",
    "final train loss",
    "test accuracy",
    "update calls",
    "real updates",
    "update calls/s",
    "note",
  )
  lines = out.splitlines()
  positions = [lines[0].index(column) for column in demo.COLUMNS]
  assert positions == sorted(positions)
  assert [line.split()[0] for line in lines[2 : 2 + len(names)]] == names
  for column, text in demo.LEGEND.items():
    assert column in demo.COLUMNS
    assert any(line.startswith(column) and line.endswith(text) for line in lines)

  # The plot: a panel per family, its rows against its baselines drawn unlike them.
  assert (tmp_path / "loss_curves.png").stat().st_size > 0
  fig = demo.plot(results, str(tmp_path / "again.png"))
  axes = [ax for ax in fig.axes if ax.get_visible()]
  assert [ax.get_title() for ax in axes] == [demo.FAMILIES[f] for f in families]
  for ax, family in zip(axes, families, strict=True):
    rows = [name for name, row in demo.ROWS.items() if row.family == family]
    baselines = list(dict.fromkeys(demo.ROWS[name].baseline for name in rows))
    lines_by_label = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines_by_label) == {f"{b} (optax)" for b in baselines} | set(rows)
    assert ax.get_legend() is not None
    for b in baselines:
      base = lines_by_label[f"{b} (optax)"]
      assert base.get_linestyle() != "-"
      assert all(base.get_color() != lines_by_label[name].get_color() for name in rows)
  ncols = min(4, len(axes))
  assert {ax.get_xlabel() for ax in axes[-ncols:]} == {"real updates"}


def test_every_row_has_a_family_and_a_baseline():
  for name, row in demo.ROWS.items():
    if row.family is None:  # an optax baseline
      assert row.baseline is None, name
    else:
      assert row.family in demo.FAMILIES, name
      assert demo.ROWS[row.baseline].family is None, name


def test_the_baseline_learns(tmp_path):
  (result,) = demo.main(["--steps", "150", "--optimizers", "adam", "--out", str(tmp_path)])
  assert result["accuracy"] > 0.9
  assert result["real_updates"] == 150
  fig = demo.plot([result], str(tmp_path / "loss_curves.png"))
  assert [ax.get_title() for ax in fig.axes] == ["optax baselines"]


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--optimizers", "nope"], "unknown optimizer"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--steps", "x"], "invalid int value"),
  ],
)
def test_bad_flags_get_a_message_not_a_traceback(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    demo.main(argv)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


def test_help_lists_the_flags(capsys):
  with pytest.raises(SystemExit) as exit_info:
    demo.main(["--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  for flag in ("--steps", "--seed", "--optimizers", "--out"):
    assert flag in out
