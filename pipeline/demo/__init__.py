"""`mimic demo`: the paper's comparison end to end, on the built-in dataset or a VOC folder.

Protocol (where the teacher's extra knowledge comes from): the teacher trains on a large pool of images (it
stands for the well-trained model a user already has); students get a small labelled set. Settings:

- ``same-data``: teacher and students see the same labelled set;
- ``limited``: students see a small labelled set, with the teacher's records on it;
- ``limited+pool``: as above, and students also mimic the teacher's records on the pool images whose labels
  they are not given (train-student ``--unlabeled``).

With ``control_teacher`` a second teacher of the same architecture and budget trains on the students' labelled
images alone, and RoI-mimic students mimic it exactly as they mimic the real teacher. What the real teacher's
students gain over the control's is transfer of knowledge the labelled images do not hold; what the control's
students gain over scratch is regularisation (a second, label-free training signal).

Every stage (data, teacher, extraction, each student, each evaluation) writes its result under the run folder
and is skipped when that result exists, so an interrupted demo resumes where it stopped. Everything a table
claims is in ``report.json``; paired significance (McNemar over test boxes) compares each student with scratch.
"""

from mimicdet.pipeline.demo.protocol import BUDGETS, MODES, SETTINGS, Budget, DemoConfig, budget_for
from mimicdet.pipeline.demo.report import format_table
from mimicdet.pipeline.demo.runner import Demo, run_demo

__all__ = ["BUDGETS", "MODES", "SETTINGS", "Budget", "Demo", "DemoConfig", "budget_for", "format_table", "run_demo"]
