"""scripts/seed_table.py: mean ± std over seeds' evaluation JSONs, and the model against its strongest baseline."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("seed_table", ROOT / "scripts" / "seed_table.py")
seed_table = sys.modules["seed_table"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seed_table)


def _result(model, bpr):
    return {"protocols": {"full": {"model": {"home": {"ndcg@10": model}},
                                   "bpr_mf": {"home": {"ndcg@10": bpr}},
                                   "popularity": {"home": {"ndcg@10": 0.01}}}}}  # fmt: skip


def test_mean_std_and_ratio_to_the_strongest_baseline(tmp_path, capsys):
    files = []
    for i, (m, b) in enumerate([(0.10, 0.05), (0.12, 0.07)]):
        files.append(tmp_path / f"s{i}.json")
        files[-1].write_text(json.dumps(_result(m, b)))
    seed_table.main([*map(str, files), "--metrics", "ndcg@10"])
    out = capsys.readouterr().out
    assert "full protocol, 2 seeds" in out
    row = next(line for line in out.splitlines() if line.startswith("| home"))
    # model 0.11 ± 0.0141; BPR-MF 0.06 the strongest baseline: 1.83x
    assert "0.1100 ± 0.0141" in row and "0.0600 ± 0.0141" in row and "1.83x (bpr_mf)" in row
