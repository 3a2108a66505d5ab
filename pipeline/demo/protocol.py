"""What `mimic demo` compares and with which budget: settings, strategies, modes (quick, default, study)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from mimicdet.detection.anchors import DEFAULT_ANCHOR_SIZES

MODES = ("quick", "default", "study")
SETTINGS = ("same-data", "limited", "limited+pool")
CONTROL = "control teacher"  # the control teacher's own row; its students' rows say "(control teacher)"
# Strategy "assistant": RoI mimic of a narrower teacher (``Budget.second_teacher_width``) trained like the teacher, a
# "teacher assistant" (Mirzadeh et al., AAAI 2020) that closes part of the width gap between teacher and student.
ASSISTANT = "assistant teacher"
_RUN_TAGS = {"assistant": "roi-teacher2"}  # run-folder names say what the student mimicked
TEACHER_ROWS = ("teacher", CONTROL, ASSISTANT)  # rows of teachers, not students
# Budget fields that only add rows: a run folder may be rerun with more of them (everything else must match).
_GROWABLE = ("seeds", "widths", "settings", "strategies", "extras", "control_teacher")


@dataclass(frozen=True)
class Budget:
    """Sizes and iteration budgets; recorded in report.json."""

    size: int = 192  # built-in image side, px
    # Built-in: smallest pasted object, sqrt(w*h) px. 24, not the generator's 12: below 32 px the teacher itself
    # recalls 4-15% of boxes at IoU 0.7, so there is nothing to mimic (docs/experiments/choosing-on-val.md).
    min_object: float = 24.0
    train: int = 150  # built-in labelled split
    pool: int = 1000  # built-in teacher pool (also the students' unlabelled images)
    test: int = 300
    val: int = 300  # built-in held-out split: settings are chosen on it (``--report-split val``), test reports
    min_size: int = 192  # preprocessing: shorter side
    max_size: int = 320
    labelled: int = 150  # labelled images a student gets (limited settings)
    # The teacher the repository ships for the built-in data (pipeline/builtin_teacher.py): used as given, not
    # trained, when the data and these three match its recorded command.
    teacher_width: float = 0.5
    teacher_iters: int = 2500
    # lr 0.04 (not 0.02): at 300 iterations the teacher's R@0.7 went 20.5 -> 32.4 (docs/experiments/diagnostics.md)
    teacher_lr: float = 0.04
    # "inception" (this tool's detector), or "torchvision:NAME": a torchvision Faster R-CNN trained as the teacher
    # (its width is its own; ``teacher_width`` does not apply).
    teacher_arch: str = "inception"
    widths: tuple[float, ...] = (0.25,)
    # Stage 1. With the shipped teacher, 750: at 250 the 1/4 students are far from converged (scratch 32 R@0.7 on
    # val against the teacher's 84); with a teacher trained for 400 iterations, students given 750 pass the teacher
    # by themselves and there is nothing left to mimic (docs/experiments/builtin-teacher.md).
    student_iters: int = 750
    stage2_iters: int = 375
    # The 1/4 students are optimisation-limited at 250 iterations: lr 0.1 raised scratch R@0.7 15.7 -> 18.6
    # and RoI mimic 16.2 -> 19.9 against lr 0.04 (docs/experiments/diagnostics.md).
    student_lr: float = 0.1
    batch_size: int = 8
    unlabeled_fraction: float = 0.5
    rois_per_image: int = 64
    eval_every: int = 100  # stage-1 recall curve points
    eval_images: int = 150  # images per periodic evaluation
    anchor_sizes: tuple[int, ...] = DEFAULT_ANCHOR_SIZES
    seeds: tuple[int, ...] = (0,)
    settings: tuple[str, ...] = ("limited+pool",)
    # Stage-1 strategies, stage 2 following each: scratch, and eq. 5 on standardised teacher channels (ahead of the
    # paper's plain eq. 5, "roi", at stage 1 on every val run; docs/experiments/choosing-on-val.md).
    strategies: tuple[str, ...] = ("none", "roi-norm")
    proposals: int = 300
    # Beyond the paper (stage 1, first setting/width/seed): a second, w=1/2 teacher mimicked beside the first
    # ("several teachers"), and the RoI-mimic student trained from an int8 store of the first teacher.
    extras: bool = False
    second_teacher_width: float = 0.5
    # RoI-mimic students (stage 1 and two-stage) of a control teacher: same width and budget as the teacher, trained
    # on the students' labelled images only; limited settings only (in same-data it would be the teacher itself).
    control_teacher: bool = False


BUDGETS: dict[str, Budget] = {
    "quick": Budget(size=128, train=24, pool=48, test=24, val=16, min_size=128, max_size=128, labelled=16,
                    teacher_width=0.25, teacher_iters=20, widths=(0.125,), student_iters=12, stage2_iters=8,
                    batch_size=4, eval_every=6, eval_images=24, rois_per_image=16, anchor_sizes=(16, 32, 64),
                    second_teacher_width=0.125, strategies=("none", "roi", "roi-norm"),
                    proposals=50),
    "default": Budget(),
    "study": Budget(teacher_width=1.0, teacher_iters=400, student_iters=250, stage2_iters=125, widths=(0.25, 0.5),
                    seeds=(0, 1), settings=SETTINGS, strategies=("none", "roi", "map", "scale"), extras=True),
}
# A user's dataset (--data): the teacher is trained in the run, briefly, so the students' budget stays short beside
# it (students trained as long as such a teacher pass it by themselves), and both RoI forms are compared.
USER_DATA = dict(teacher_width=1.0, teacher_iters=400, student_iters=250, stage2_iters=125,
                 strategies=("none", "roi", "roi-norm"), anchor_sizes=(32, 64, 128, 256))


def budget_for(mode: str, *, real_data: bool) -> Budget:
    """The mode's budget; a user's dataset (real photos, larger objects, no built-in pool) gets anchors up to
    256 px and a smaller labelled subset, the rest of its train split acting as the unlabelled pool."""
    if mode not in MODES:
        raise ValueError(f"demo mode must be one of {', '.join(MODES)}, got {mode!r}")
    b = BUDGETS[mode]
    if real_data:
        b = replace(b, **(USER_DATA if mode == "default" else {"anchor_sizes": USER_DATA["anchor_sizes"]}),
                    labelled=min(b.labelled, 40))
    return b


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("runs/demo")
    data: Path | None = None  # a VOC dataset instead of the built-in one
    mode: str = "default"
    budget: Budget | None = None  # None: BUDGETS[mode]
    device: str = "auto"
    workers: int = 2
    progress: bool = True
    # "test": the final report; "val": the same table on the validation split, for choosing settings (its own
    # eval-val/, plots-val/ and report-val.json, so the test figures are read only once per configuration).
    report_split: str = "test"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"demo mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.report_split not in ("test", "val"):
            raise ValueError(f"--report-split must be test or val, got {self.report_split!r}")

    @property
    def plan(self) -> Budget:
        return self.budget or BUDGETS[self.mode]
