"""The demo's stages: data, teacher, extraction, students, evaluations; each is skipped when its result
exists, so an interrupted demo resumes where it stopped."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mimicdet.data.paths import atomic_path, write_json
from mimicdet.detection.run_folder import claim_run_folder
from mimicdet.pipeline.demo.protocol import _GROWABLE, _RUN_TAGS, ASSISTANT, CONTROL, DemoConfig
from mimicdet.pipeline.demo.report import (
    _environment,
    _folder_bytes,
    _row,
    _w,
    compare_with_scratch,
    format_table,
    side_by_side_latency,
    write_plots,
)

if TYPE_CHECKING:
    from mimicdet.student.train import StudentConfig


class Demo:
    def __init__(self, cfg: DemoConfig, echo: Callable[[str], None] = print):
        self.cfg, self.b, self.echo = cfg, cfg.plan, echo
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        split = cfg.report_split
        self.eval_dir = self.out / ("eval" if split == "test" else f"eval-{split}")
        self.report_name = "report.json" if split == "test" else f"report-{split}.json"
        # Seconds per stage, kept in the run folder so a resumed run still reports what earlier runs spent.
        self._timings_path = self.out / "timings.json"
        self.timings: dict[str, float] = (json.loads(self._timings_path.read_text())
                                          if self._timings_path.exists() else {})
        self._extra_teachers: dict[str, dict] = {}  # control / assistant teacher name -> its table row
        self._labelled_count: int | None = None  # images in the labelled split, read once

    def _stage(self, name: str, done: Path, fn: Callable[[], Any]) -> None:
        """Run ``fn`` unless ``done`` exists."""
        if done.exists():
            self.echo(f"[demo] {name}: done earlier ({done})")
            return
        self.echo(f"[demo] {name} ...")
        t = time.perf_counter()
        fn()
        self.timings[name] = time.perf_counter() - t
        _write_json(self._timings_path, self.timings)
        self.echo(f"[demo] {name}: {self.timings[name]:.0f} s")

    # -- data

    def data_root(self) -> Path:
        if self.cfg.data is not None:
            from mimicdet.data.summary import describe_voc

            self.echo(describe_voc(Path(self.cfg.data)))
            return Path(self.cfg.data)
        from mimicdet.data.synthetic import SyntheticConfig, ensure_dataset

        root = self.out / "data"
        b = self.b
        ensure_dataset(SyntheticConfig(out=root, train=b.train, test=b.test, pool=b.pool, val=b.val, size=b.size,
                                       min_object=b.min_object,
                                       progress=self.cfg.progress), echo=self.echo)
        return root

    def splits(self, root: Path) -> dict[str, str]:
        """Which split plays which part. Built-in: teacher on ``pool``, labels from ``train``. A user dataset
        without a pool: the teacher trains on all of ``train``; students get a labelled subset of it and mimic
        the rest (the teacher's records on all of ``train``)."""
        has_pool = (root / "ImageSets" / "Main" / "pool.txt").exists()
        has_val = (root / "ImageSets" / "Main" / "val.txt").exists()
        return {"teacher": "pool" if has_pool else "train", "labelled": "train",
                "unlabelled": "pool" if has_pool else "train", "test": "test",
                # Training curves (a choice-making view) read val where there is one, the test split otherwise.
                "curves": "val" if has_val else "test", "report": self.cfg.report_split}

    # -- teacher and stores

    def teacher(self, root: Path, split: str, *, name: str = "teacher", width: float | None = None,
                subset: int | None = None, subset_seed: int = 0) -> Path:
        from mimicdet.pipeline.teacher import TeacherConfig, train_teacher

        b, run = self.b, self.out / name
        width = b.teacher_width if width is None else width
        if name == "teacher" and self._shipped_teacher(root, split, run):
            return run / "model.pt"
        self._stage(name, run / "model.pt", lambda: train_teacher(TeacherConfig(
            data=root, split=split, subset=subset, subset_seed=subset_seed, out=run, arch=b.teacher_arch, width=width,
            iters=b.teacher_iters, batch_size=b.batch_size, lr=b.teacher_lr, min_size=b.min_size,
            max_size=b.max_size, anchor_sizes=b.anchor_sizes, flip=False,
            device=self.cfg.device, workers=self.cfg.workers, progress=self.cfg.progress)))
        return run / "model.pt"

    def _shipped_teacher(self, root: Path, split: str, run: Path, recipe=None, asset: Path | None = None) -> bool:
        """Put the shipped teacher in ``run`` when this is the data and budget it was made with (True), after
        checking its sha256 and its training set's digest; False: the teacher is trained here. ``recipe`` and
        ``asset``: another recorded teacher than the shipped one (tests)."""
        from mimicdet.data import load_dataset
        from mimicdet.pipeline.builtin_teacher import ASSET, RECIPE, shipped_teacher

        b, r = self.b, recipe or RECIPE
        ours = (self.cfg.data, b.teacher_arch, b.size, b.train, b.test, b.pool, b.val, b.min_object, split, b.teacher_width,
                b.teacher_iters, b.teacher_lr, b.batch_size, b.min_size, b.max_size, tuple(b.anchor_sizes))
        recipe = (None, "inception", r.size, r.train, r.test, r.pool, r.val, r.min_object, r.split, r.width, r.iters, r.lr,
                  r.batch_size, r.min_size, r.max_size, r.anchor_sizes)
        if ours != recipe:
            return False
        shipped = shipped_teacher(asset or ASSET)
        if shipped is None:
            self.echo("[demo] no shipped teacher in this checkout (pipeline/builtin_teacher/); training it here")
            return False
        model, run_json = shipped
        digest = load_dataset(root, split).digest()
        if run_json["dataset"]["digest"] != digest:
            raise ValueError(f"{root}/{split}: dataset digest {digest[:12]} differs from the shipped teacher's "
                             f"{run_json['dataset']['digest'][:12]} ({model.parent}/run.json); the built-in "
                             "generator changed: rerun `make teacher`")
        if not (run / "model.pt").exists():
            run.mkdir(parents=True, exist_ok=True)
            _write_json(run / "run.json", run_json)
            with atomic_path(run / "model.pt") as tmp:
                shutil.copyfile(model, tmp)
        self.echo(f"[demo] teacher: the shipped one ({model}, w={r.width:g}, {r.iters} iterations; `make teacher` "
                  "remakes it)")
        return True

    def store(self, teacher: Path, root: Path, split: str, *, tag: str = "", dtype: str = "float16") -> str:
        from mimicdet.pipeline.extract import ExtractConfig, run_extract

        url = self.out / "stores" / f"{split}{tag}"
        done = self.out / "stores" / f"{split}{tag}.done"

        def work() -> None:
            mode = "resume" if (url / "manifest.json").exists() else "create"
            run_extract(ExtractConfig(teacher=teacher, data=root, split=split, out=str(url), mode=mode, dtype=dtype,
                                      proposals=self.b.proposals, device=self.cfg.device,
                                      loader_workers=min(1, self.cfg.workers), progress=self.cfg.progress))
            done.write_text("ok\n")

        self._stage(f"extract {split}{tag}", done, work)
        return str(url)

    # -- students

    def student_config(self, name: str, *, root: Path, store: str | tuple[str, ...], split: str, width: float,
                       mimic: str, seed: int, labelled: int | None, unlabeled: str | tuple[str, ...] | None = None,
                       unlabeled_split: str | None = None, scale: bool = False, mimic_norm: str = "none",
                       curves_split: str = "test") -> StudentConfig:
        """A stage-1 student of this demo's budget in ``students/name`` (its stage 2: ``.stage2(...)``)."""
        from mimicdet.student.train import StudentConfig

        b = self.b
        return StudentConfig(
            store=store, data=root, split=split, out=self.out / "students" / name, width=width, stage=1, mimic=mimic,
            mimic_norm=mimic_norm if mimic != "none" else "none", scale_mimic=scale, iters=b.student_iters,
            batch_size=b.batch_size, lr=b.student_lr, rois_per_image=b.rois_per_image, anchor_sizes=b.anchor_sizes,
            unlabeled=unlabeled, unlabeled_data=root if unlabeled else None, unlabeled_split=unlabeled_split or "train",
            unlabeled_fraction=b.unlabeled_fraction, subset=labelled, subset_seed=seed, seed=seed,
            device=self.cfg.device, workers=min(1, self.cfg.workers), progress=self.cfg.progress,
            eval_every=b.eval_every, eval_split=curves_split, eval_max_images=b.eval_images,
            checkpoint_every=max(10, b.student_iters // 4),
        )

    def stage2_config(self, first: StudentConfig, name: str, *, mimic: str, unlabeled: bool = True) -> StudentConfig:
        """The stage-2 student that follows ``first`` in ``students/name``, with this demo's stage-2 budget."""
        keep = unlabeled and mimic != "none"
        return first.stage2(self.out / "students" / name, iters=self.b.stage2_iters, mimic=mimic,
                            mimic_norm=first.mimic_norm if mimic != "none" else "none",
                            unlabeled=first.unlabeled if keep else None,
                            unlabeled_data=first.unlabeled_data if keep else None)

    def train_student(self, cfg: StudentConfig) -> Path:
        from mimicdet.student.train import run_train_student

        self._stage(f"student {cfg.out.name}", cfg.out / "model.pt", lambda: run_train_student(cfg))
        return cfg.out / "model.pt"

    # -- evaluation

    def evaluate(self, name: str, model_path: Path, root: Path, *, detection: bool) -> dict:
        from mimicdet.data import load_dataset
        from mimicdet.detection.detector import load_detector
        from mimicdet.detection.evaluate import evaluate_model, report_json
        from mimicdet.detection.metrics import to_jsonable

        path = self.eval_dir / f"{name}.json"

        def work() -> None:
            model, meta = load_detector(model_path)
            test = load_dataset(root, self.cfg.report_split, classes=meta.get("classes"))
            metrics = ("recall", "voc", "coco") if detection else ("recall",)
            report = evaluate_model(model, meta, test, metrics=metrics, device=self.cfg.device, profile=True,
                                    progress=self.cfg.progress, name=name, keep_hits=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            slim = report_json(report)
            slim["recall_curves"] = to_jsonable(report["recall"]["curves"])  # for the demo's plots
            _write_json(path, slim)

        self._stage(f"evaluate {name}", path, work)
        return json.loads(path.read_text())

    # -- the whole run

    def claim_budget(self) -> None:
        """Refuse a run folder whose finished stages were made with another budget (they would be skipped as done
        and reported under this one). What to run (seeds, widths, settings, strategies, extras, control teacher)
        may grow between runs; sizes, iterations and learning rates may not."""
        budget = asdict(self.b)
        if budget["teacher_arch"] == "inception":  # the default is left out: folders without it hold its runs
            del budget["teacher_arch"]
        claim_run_folder(self.out, "budget.json", budget, ignore=_GROWABLE, what="a demo run",
                         advice="its finished stages would be reported under the new one. Choose another --out, "
                                "or pass the options that made it")

    def run(self) -> dict:
        b = self.b
        self.claim_budget()
        root = self.data_root()
        parts = self.splits(root)
        if self.cfg.report_split == "val" and parts["curves"] != "val":
            raise ValueError(f"{root}: no val split (ImageSets/Main/val.txt) to report on; add one or use the test "
                             "split (--report-split test)")
        teacher = self.teacher(root, parts["teacher"])
        stores = {s: self.store(teacher, root, s) for s in {parts["labelled"], parts["unlabelled"]}}
        rows: list[dict] = []
        t_eval = self.evaluate("teacher", teacher, root, detection=True)
        width = b.teacher_width if b.teacher_arch == "inception" else 1.0  # a torchvision detector is whole
        rows.append(_row("teacher", "-", "-", width, 2, t_eval) | {"model_path": str(teacher), "arch": b.teacher_arch})
        for setting in b.settings:
            for width in b.widths:
                for seed in b.seeds:
                    rows += self._setting(setting, width, seed, root, parts, stores)
        rows[1:1] = list(self._extra_teachers.values())  # control and assistant teachers beside the teacher
        if b.extras:
            rows += self._extras(root, parts, stores)
        report = self.report(rows, root, parts)
        return report

    def _setting(self, setting: str, width: float, seed: int, root: Path, parts: dict, stores: dict) -> list[dict]:
        b = self.b
        labelled = None if setting == "same-data" else b.labelled
        split = parts["teacher"] if setting == "same-data" else parts["labelled"]
        if setting == "same-data":
            store = stores.get(split) or self.store(self.out / "teacher" / "model.pt", root, split)
            stores[split] = store
        else:
            store = stores[parts["labelled"]]
        unl = stores[parts["unlabelled"]] if setting == "limited+pool" else None
        own_store, own_unl = store, unl
        rows = []
        for strategy in b.strategies:
            tag = f"{setting}-w{_w(width)}-s{seed}-{_RUN_TAGS.get(strategy, strategy)}"
            mimic = {"none": "none", "roi": "roi", "map": "map", "scale": "roi", "assistant": "roi",
                     "roi-norm": "roi", "roi-lab2": "roi"}[strategy]
            norm = "channel" if strategy == "roi-norm" else "none"
            store, unl = own_store, own_unl
            if strategy == "assistant":
                store, unl = self._assistant_stores(root, parts, split, pool=unl is not None)
            # roi-lab2: the RoI-mimic stage-1 student (the same run as "roi"), then a stage 2 on labelled images only.
            s1_tag = tag.removesuffix("-roi-lab2") + "-roi" if strategy == "roi-lab2" else tag
            c1 = self.student_config(f"{s1_tag}-stage1", root=root, store=store, split=split, width=width,
                                     mimic=mimic, seed=seed, labelled=labelled,
                                     unlabeled=unl if mimic != "none" else None, unlabeled_split=parts["unlabelled"],
                                     scale=strategy == "scale", mimic_norm=norm, curves_split=parts.get("curves", "test"))
            s1 = self.train_student(c1)
            ev1 = self.evaluate(f"{s1_tag}-stage1", s1, root, detection=False)
            used = [store] + ([unl] if unl and mimic != "none" else [])
            if strategy != "roi-lab2":  # its stage 1 is the roi row
                rows.append(_row(strategy, setting, seed, width, 1, ev1, run=self.out / "students" / f"{tag}-stage1")
                            | {"model_path": str(s1), "input_scale": 0.5 if strategy == "scale" else 1.0}
                            | ({"store_mb": sum(_folder_bytes(Path(u)) for u in used) / 2**20}
                               if mimic != "none" else {}))
            # Stage 2: the full detector from stage 1; mimic students add two-stage (logits) mimic.
            mimic2 = "none" if strategy == "none" else "roi"
            s2 = self.train_student(self.stage2_config(c1, f"{tag}-stage2", mimic=mimic2,
                                                       unlabeled=strategy != "roi-lab2"))
            ev2 = self.evaluate(f"{tag}-stage2", s2, root, detection=True)
            name2 = "scratch" if strategy == "none" else f"{strategy} + two-stage"
            rows.append(_row(name2, setting, seed, width, 2, ev2)
                        | {"model_path": str(s2), "input_scale": 0.5 if strategy == "scale" else 1.0})
        if b.control_teacher and setting != "same-data":
            rows += self._control_students(setting, width, seed, root, parts, store_split=split, labelled=labelled)
        return rows

    def _assistant_stores(self, root: Path, parts: dict, split: str, *, pool: bool) -> tuple[str, str | None]:
        """The teacher assistant's stores: a ``second_teacher_width`` teacher (the one ``extras`` trains: same data
        and budget as the teacher), extracted on the students' images and, with the pool, on the pool."""
        b = self.b
        model = self.second_teacher(root, parts)
        self._teacher_row("teacher2", model, root, ASSISTANT, b.second_teacher_width, "-")
        store = self.store(model, root, split, tag="-teacher2")
        return store, self.store(model, root, parts["unlabelled"], tag="-teacher2") if pool else None

    def _control_teacher(self, root: Path, parts: dict, seed: int) -> tuple[str, Path]:
        """The control teacher for ``seed``'s labelled images: one for all seeds when they get every labelled
        image (the built-in set), else one per seed (a user dataset's seeded subset)."""
        from mimicdet.data import load_dataset

        b = self.b
        if self._labelled_count is None:
            self._labelled_count = len(load_dataset(root, parts["labelled"]))
        whole = b.labelled >= self._labelled_count
        name = "teacher-control" if whole else f"teacher-control-s{seed}"
        model = self.teacher(root, parts["labelled"], name=name, subset=None if whole else b.labelled,
                             subset_seed=seed)
        self._teacher_row(name, model, root, CONTROL, b.teacher_width, "-" if whole else seed)
        return name, model

    def second_teacher(self, root: Path, parts: dict) -> Path:
        """The ``second_teacher_width`` teacher, trained like the teacher: the extras' second teacher and the
        teacher assistant are this one model."""
        return self.teacher(root, parts["teacher"], name="teacher2", width=self.b.second_teacher_width)

    def _teacher_row(self, name: str, model: Path, root: Path, strategy: str, width: float, seed) -> None:
        """Scores a control or assistant teacher once per run and keeps its table row."""
        if name not in self._extra_teachers:
            ev = self.evaluate(name, model, root, detection=True)
            self._extra_teachers[name] = _row(strategy, "-", seed, width, 2, ev) | {"model_path": str(model)}

    def _control_students(self, setting: str, width: float, seed: int, root: Path, parts: dict, *,
                          store_split: str, labelled: int | None) -> list[dict]:
        """RoI mimic (stage 1) and two-stage mimic (stage 2) of the control teacher, trained exactly as the real
        teacher's RoI-mimic students are; each row names its real-teacher twin for the transfer comparison."""
        name, model = self._control_teacher(root, parts, seed)
        tag = name.replace("teacher-", "-")
        store = self.store(model, root, store_split, tag=tag)
        unl = self.store(model, root, parts["unlabelled"], tag=tag) if setting == "limited+pool" else None
        run = f"{setting}-w{_w(width)}-s{seed}-roi-{name.removeprefix('teacher-')}"
        c1 = self.student_config(f"{run}-stage1", root=root, store=store, split=store_split, width=width, mimic="roi",
                                 seed=seed, labelled=labelled, unlabeled=unl, unlabeled_split=parts["unlabelled"])
        s1 = self.train_student(c1)
        ev1 = self.evaluate(f"{run}-stage1", s1, root, detection=False)
        s2 = self.train_student(self.stage2_config(c1, f"{run}-stage2", mimic="roi"))
        ev2 = self.evaluate(f"{run}-stage2", s2, root, detection=True)
        return [
            _row(f"roi ({CONTROL})", setting, seed, width, 1, ev1, run=self.out / "students" / f"{run}-stage1")
            | {"model_path": str(s1), "input_scale": 1.0, "twin": "roi",
               "store_mb": sum(_folder_bytes(Path(u)) for u in (store, unl) if u) / 2**20},
            _row(f"roi + two-stage ({CONTROL})", setting, seed, width, 2, ev2)
            | {"model_path": str(s2), "input_scale": 1.0, "twin": "roi + two-stage"},
        ]

    def _extras(self, root: Path, parts: dict, stores: dict) -> list[dict]:
        """Stage-1 RoI-mimic students beyond the paper, against the same scratch student: (a) two teachers, the
        w=1 teacher and a w=1/2 one trained on the same pool (own transform layer each, weights 1 and 1); (b) the
        w=1 teacher's records stored as int8 instead of float16 (store sizes in the rows)."""
        b = self.b
        setting, width, seed = b.settings[0], b.widths[0], b.seeds[0]
        labelled = None if setting == "same-data" else b.labelled
        split = parts["teacher"] if setting == "same-data" else parts["labelled"]
        pool = setting == "limited+pool"
        splits = [split] + ([parts["unlabelled"]] if pool and parts["unlabelled"] != split else [])
        second = self.second_teacher(root, parts)
        second_stores = {s: self.store(second, root, s, tag="-teacher2") for s in splits}
        teacher = self.out / "teacher" / "model.pt"
        int8_stores = {s: self.store(teacher, root, s, tag="-int8", dtype="int8") for s in splits}
        base = f"{setting}-w{_w(width)}-s{seed}"
        unl = parts["unlabelled"] if pool else None
        variants = {
            "roi, 2 teachers": dict(store=(stores[split], second_stores[split]),
                                    unlabeled=(stores[unl], second_stores[unl]) if unl else None),
            "roi, int8 store": dict(store=int8_stores[split], unlabeled=int8_stores[unl] if unl else None),
        }
        rows = []
        for strategy, kw in variants.items():
            tag = f"{base}-{strategy.replace(', ', '-').replace(' ', '_')}-stage1"
            s1 = self.train_student(self.student_config(tag, root=root, split=split, width=width, mimic="roi",
                                                        seed=seed, labelled=labelled,
                                                        unlabeled_split=parts["unlabelled"], **kw))
            ev = self.evaluate(tag, s1, root, detection=False)
            used = [u for k in ("store", "unlabeled") if kw[k] for u in (kw[k] if isinstance(kw[k], tuple) else (kw[k],))]
            rows.append(_row(strategy, setting, seed, width, 1, ev, run=self.out / "students" / tag)
                        | {"model_path": str(s1), "input_scale": 1.0,
                           "store_mb": sum(_folder_bytes(Path(u)) for u in used) / 2**20})
        return rows

    # -- report

    def report(self, rows: list[dict], root: Path, parts: dict) -> dict:
        side_by_side_latency(rows, side=self.b.min_size, device=self.cfg.device)
        teacher_ms = rows[0]["ms_per_image"]
        for r in rows:
            r["speedup"] = teacher_ms / r["ms_per_image"] if r.get("ms_per_image") else None
        compare_with_scratch(rows)
        report = {
            "mode": self.cfg.mode,
            "data": str(root),
            "splits": parts,
            "budget": asdict(self.b),
            "rows": [{k: v for k, v in r.items() if k not in ("hits", "voc_per_image", "curve", "run")} for r in rows],
            "timings_s": self.timings,
            "environment": _environment(),
        }
        _write_json(self.out / self.report_name, report)
        split = self.cfg.report_split
        write_plots(rows, self.out / ("plots" if split == "test" else f"plots-{split}"), self.eval_dir)
        self.echo(format_table(report))
        return report


def _write_json(path: Path, obj: Any) -> None:
    write_json(path, obj, indent=1)


def run_demo(cfg: DemoConfig, echo: Callable[[str], None] = print) -> dict:
    return Demo(cfg, echo).run()
