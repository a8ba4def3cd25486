import pytest

from optaxderived import demo


def test_demo_trains_every_row_and_writes_the_plot(tmp_path, capsys):
  results = demo.main(["--steps", "4", "--out", str(tmp_path)])
  assert [r["name"] for r in results] == list(demo.ROWS)
  out = capsys.readouterr().out
  for name in demo.ROWS:
    assert name in out
  assert (tmp_path / "loss_curves.png").stat().st_size > 0
  for r in results:
    assert 0 < r["real_updates"] <= 4 * 128 // demo.ROWS[r["name"]].batch_size


def test_the_baseline_learns(tmp_path):
  (result,) = demo.main(["--steps", "150", "--optimizers", "adam", "--out", str(tmp_path)])
  assert result["accuracy"] > 0.9
  assert result["real_updates"] == 150


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
