"""Claim: sharing each teacher's logit table through the Ray object store divides the teacher work
per student trial by the number of students that share the teacher (here 4), against every
trial computing its own table from the teacher checkpoint.

How: one ResNet20 teacher on digits (1024 training images, 2 epochs), then 4 KD students
(T = 3, 10 and t1 = 1, 2; 1 epoch, width 16) in "paper" mode (--mode views: a table over all 162
crop x flip views, 162x the teacher work), on a local Ray instance, twice in one run:
  shared    the orchestration layer: one logits task per teacher, ray.put once, students get a
            reference through tune.with_parameters;
  baseline  the same Tune grid, but each trial loads the teacher and computes its own table.
Printed: teacher forward images and teacher seconds per student trial, and the ratio.

    .venv/bin/python benchmarks/bench_object_store.py [--mode paper|views] [--limit-train 1024]
"""
import argparse
import json
import os
import tempfile
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", default="paper", help="logits mode: paper or views")
    ap.add_argument("--limit-train", type=int, default=1024)
    args = ap.parse_args()

    import ray
    from ray import tune

    from nodekd_ray.orchestration import cluster, driver, tasks
    from nodekd_ray import sweep as S
    from nodekd_ray.kd import compute_logit_table
    from nodekd_ray.checkpoints import load_checkpoint

    settings = S.Settings(teacher={"epochs": 2, "batch_size": 64, "limit_train": args.limit_train},
                          student={"epochs": 1, "batch_size": 64, "limit_train": args.limit_train, "limit_test": 128,
                                   "width": 16, "stem_channels": 8}, attack_images=32)
    spec = S.SweepSpec("bench", datasets=("digits",), kd_teachers=("resnet20",), temperatures=(3.0, 10.0),
                       kd_horizons=(1.0, 2.0), logits_mode=args.mode)
    n_students = len(S.plan([spec]).students)
    root = tempfile.mkdtemp(prefix="bench-object-store-")
    quiet = lambda *a, **k: None  # noqa: E731
    cluster.connect("local", num_cpus=2)

    # shared: the orchestration layer as users run it
    t0 = time.perf_counter()
    summary = driver.run_sweep([spec], settings, os.path.join(root, "shared"), log=quiet)
    shared_wall = time.perf_counter() - t0
    st = S.Storage(os.path.join(root, "shared"))
    side = json.load(open(st.logits("teacher-digits-resnet20-s0", args.mode, "json")))
    students = [r for r in st.records() if r["kind"] == "node_kd"]
    assert len(students) == n_students and all(r["final"]["teacher_forwards"] == 0 for r in students)
    shared = {"images": side["teacher_forward_images"] / n_students, "seconds": side["seconds"] / n_students}

    # baseline: every trial loads the teacher and computes its own table
    base_root = os.path.join(root, "baseline")
    os.makedirs(os.path.join(base_root, "models"))
    os.link(st.model("teacher-digits-resnet20-s0"), os.path.join(base_root, "models", "teacher-digits-resnet20-s0.pt"))
    data_ref = ray.remote(tasks._load_data).remote("digits", "data", False, (512, 256))

    def own_table_trial(config, data_refs, settings, storage_root):
        job = tasks.job_from_dict(config["job"])
        s = S.Settings(**settings)
        storage = S.Storage(storage_root)
        data = tasks.data_from_ref(ray.get(data_refs["digits"]))
        cfg = S.student_config(job, s)
        train = data[0].take(cfg.limit_train)
        t = time.perf_counter()
        teacher, _ = load_checkpoint(storage.model(job.teacher_job.key))
        table = compute_logit_table(teacher, train, mode=job.logits_mode, crop_padding=cfg.augment()[0])
        secs = time.perf_counter() - t
        views = table.shape[1] if table.ndim == 3 else 1
        final = S.run_training(job, s, storage, data, table=table)
        tune.report({**final, "teacher_seconds": secs, "teacher_images": len(train) * views})

    jobs = [j for j in S.plan([spec]).students]
    t0 = time.perf_counter()
    grid = tune.Tuner(
        tune.with_resources(tune.with_parameters(own_table_trial, data_refs={"digits": data_ref}, settings=settings.to_dict(),
                                                 storage_root=base_root), {"cpu": 1}),
        param_space={"job": tune.grid_search([tasks.job_to_dict(j) for j in jobs])},
        run_config=tune.RunConfig(name="baseline", storage_path=os.path.join(base_root, "tune"), verbose=0),
    ).fit()
    base_wall = time.perf_counter() - t0
    res = [r.metrics for r in grid]
    baseline = {"images": sum(m["teacher_images"] for m in res) / len(res),
                "seconds": sum(m["teacher_seconds"] for m in res) / len(res)}

    print(f"grid: 1 teacher (resnet20), {n_students} KD students, logits mode {args.mode!r}, "
          f"{args.limit_train} training images; local Ray, 2 CPUs")
    print(f"  shared table (object store):  {shared['images']:10,.0f} teacher images/trial  "
          f"{shared['seconds']:7.2f} s teacher time/trial")
    print(f"  each trial computes its own:  {baseline['images']:10,.0f} teacher images/trial  "
          f"{baseline['seconds']:7.2f} s teacher time/trial")
    print(f"teacher work per trial, baseline / shared: images {baseline['images'] / shared['images']:.1f}x, "
          f"seconds {baseline['seconds'] / shared['seconds']:.1f}x")
    print(f"student stage wall time: shared {summary['seconds']['logits'] + summary['seconds']['students']:.0f} s "
          f"(logits + students), baseline {base_wall:.0f} s")


if __name__ == "__main__":
    main()
