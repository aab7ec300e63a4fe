"""A broken newest checkpoint: resume falls back to the newest intact one, warning with the broken file's
name; with every checkpoint broken, the error names each file. Real training processes, real files."""

import pytest

from tests.conftest import run_train

ARGS = ["debug=toy", "trainer.max_steps=10", "trainer.checkpoint_every=5", "trainer.eval_every=5"]


@pytest.fixture
def trained(tmp_path, toy_cfg, toy_features):
    run_dir = tmp_path / "run"
    args = [*ARGS, f"data.cache_dir={toy_cfg.data.cache_dir}", f"hydra.run.dir={run_dir}"]
    r = run_train(args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000010" and (ckpts / "step-00000005").is_dir()
    return args, tmp_path, ckpts


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "break_, file",
    [
        (lambda d: _truncate(d / "model.safetensors"), "model.safetensors"),
        (lambda d: (d / "trainer.json").write_text(""), "trainer.json"),
        (lambda d: (d / "trainer.json").write_text("{}"), "trainer.json"),
        (lambda d: _truncate(d / "state.pt"), "state.pt"),
    ],
)
def test_resume_falls_back_to_the_newest_intact_checkpoint_naming_the_broken_one(trained, break_, file):
    args, cwd, ckpts = trained
    break_(ckpts / "step-00000010")
    r = run_train(args, cwd)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert f"step-00000010/{file}" in out and "falling back" in out
    assert "resumed from" in out and "step-00000005 (step 5)" in out
    assert (ckpts / "latest").read_text().strip() == "step-00000010"  # trained again past it


def test_with_every_checkpoint_broken_the_error_names_each_file(trained):
    args, cwd, ckpts = trained
    _truncate(ckpts / "step-00000010" / "model.safetensors")
    (ckpts / "step-00000005" / "trainer.json").write_text("")
    r = run_train(args, cwd)
    assert r.returncode != 0
    assert "step-00000010/model.safetensors" in r.stderr and "step-00000005/trainer.json" in r.stderr
