"""`python -m densenet_jax.summary`: parameters, MACs counted from the jaxpr, training memory."""

from densenet_jax import models, summary


def test_summary_counts_paper_macs():
  assert round(summary.forward_macs(models.densenet_bc_100(), (1, 32, 32, 3)) / 1e9, 3) == 0.288
  assert round(summary.forward_macs(models.densenet121(), (1, 224, 224, 3)) / 1e9, 2) == 2.83
  # the same model whatever the block form (the one-buffer block runs its layers in loops)
  assert round(summary.forward_macs(models.densenet_bc_100(block_buffer=True),
                                    (1, 32, 32, 3)) / 1e9, 3) == 0.288
  rows = [summary.summarize("densenet40", memory=False)]
  assert "| densenet40 | 40 | 12 | 32x32 | 1,019,722 | 0.265 |" in summary.markdown(rows)


def test_cli_says_which_model_it_compiles_and_prints_the_table(capsys, monkeypatch):
  # The memory column compiles two training steps per model: a line per model on stderr.
  monkeypatch.setattr(summary, "summarize", lambda name, memory: {
      "model": name, "depth": 40, "growth": 12, "input": "32x32", "params": 1, "gmacs": 0.5,
      "batch": 64, "temp_gib": 2.0, "temp_gib_efficient": 1.0})
  summary.main(["--models", "densenet40", "densenet_bc_100"])
  out, err = capsys.readouterr()
  assert [l.split(":")[0] for l in err.splitlines()] == ["[1/2] densenet40",
                                                         "[2/2] densenet_bc_100"]
  assert "| densenet_bc_100 | 40 | 12 | 32x32 | 1 | 0.500 | 64 | 2.00 | 1.00 | 0.50 |" in out
