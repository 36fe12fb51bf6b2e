"""sweeps/audit.py end to end on a local Ray instance (--smoke-test, one seed): every audit attack
runs as a Ray task into the same hive-partitioned Parquet data set, and the report has audit.md."""
import os

import pytest

from nodekd_ray import sweep as S
from nodekd_ray.attacks import AUDIT_ATTACKS, NODE_ONLY
from test_orchestration import EPOCH1, rows, sweep


@pytest.mark.slow
def test_audit_sweep_end_to_end(tmp_path):
    store = tmp_path / "store"
    r = sweep("audit.py", store, *EPOCH1, "--seeds", "1", "--temperatures", "10")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    got = rows(store)
    teacher, node, kd = "teacher-digits-resnet20-s0", "node-digits-t1-s0", "kd-digits-t1-resnet20-T10-lam0.9-s0"
    eps = set(float(e) for e in S.SMOKE["eps_255"])
    # every model x attack x eps exactly once; no solver attacks on the ResNet, no transfer-node on the no-KD NODE
    seen = [(a["model_key"], a["attack"], a["eps_255"]) for a in got]
    assert len(seen) == len(set(seen))
    for key, skip in ((teacher, set(NODE_ONLY) | {"transfer-teacher"}), (node, {"transfer-node"}), (kd, set())):
        want = {a for a in ("pgd", "mifgsm") + AUDIT_ATTACKS if a not in skip}
        assert {a for k, a, _ in seen if k == key} == want, key
        for a in want:
            assert {e for k, att, e in seen if k == key and att == a} == eps, (key, a)
    by = {(a["model_key"], a["attack"], a["eps_255"]): a for a in got}
    # every NODE row records how it was integrated; the tolerance rows their own tolerance
    for a in got:
        if a["kind"] != "teacher":
            assert a["solver"] == "dopri5" and a["time_input"] == "raw" and a["nfe_per_image"] > 0, a
        else:
            assert a["solver"] == "" and a["rtol"] is None
        assert a["num_classes"] == 10 and 0 < a["top_class_fraction"] <= 1
    assert by[(kd, "tol-1e-1", 8.0)]["rtol"] == 0.1 and by[(kd, "tol-1e-5", 8.0)]["atol"] == 1e-5
    assert by[(kd, "pgd", 8.0)]["rtol"] == 1e-3
    assert by[(kd, "transfer-teacher", 8.0)]["source"] == teacher
    assert by[(kd, "transfer-node", 8.0)]["source"] == node
    assert by[(kd, "pgd-rk4", 8.0)]["source"] == f"rk4 x {S.SMOKE['audit']['rk4_steps']}"
    assert by[(kd, "transfer-tol-1e-5", 8.0)]["source"] == "rtol 1e-05" and by[(kd, "transfer-tol-1e-5", 8.0)]["rtol"] == 1e-3
    assert by[(kd, "pgd-restarts", 8.0)]["restarts"] == S.SMOKE["audit"]["restarts"]
    assert by[(kd, "pgd-long", 8.0)]["steps"] == S.SMOKE["audit"]["long_steps"]
    assert by[(kd, "pgd", 8.0)]["steps"] == 10 and by[(kd, "pgd", 8.0)]["alpha_255"] == 1.0
    # the report: audit.md with its three verdicts, also printed at the end of the run
    text = open(os.path.join(store, "report", "audit.md")).read()
    for claim in ("KD improves robustness", "a longer horizon improves robustness", "no obfuscated gradients",
                  "robust accuracy depends on the solver tolerance"):
        assert f"**{claim}: " in text and claim in r.stdout
    assert "audit verdicts" in r.stdout
