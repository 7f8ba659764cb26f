"""The map stage of a task as a list of small steps, each counting what it keeps, drops and quarantines.

A step takes an iterator of items and yields the items it keeps; :func:`run_steps` chains a task's steps
(each reads what the one before it yields) and drains the last. Items flow one at a time through the
whole chain, so a task streams and its outputs keep input order. The kinds of item:

- ``read`` is the *source*: it reads nothing and yields the task's raw items, quarantining malformed input;
- ``format`` turns raw items into records, quarantining those it cannot;
- ``langid``, ``filters``, ``decontam``, ``pii``, ``identity`` take records and yield the records they keep;
- ``write`` is the *sink*: it writes each record and, when its input ends, the per-task files the reduce
  reads. Nothing may follow it.

Each step's :class:`StageCount` obeys ``in = out + dropped + quarantined`` and times the step alone (not
the steps before or after it). The counts of every step but the sink are the task's rows of the dataset's
stage table (the sink writes all it gets).

A recipe's ``steps:`` lists step names in order (default :data:`moeforge.data.recipe.DEFAULT_STEPS`);
:func:`check_steps` refuses unknown names, repeats and orders whose items do not fit. Adding a step is one
class — a :class:`RecordStep` with a ``name``, an ``apply`` and ``@register``, in a module this package
imports — and its name in a recipe's ``steps:``. Steps know nothing of the executor that runs them.

Modules: :mod:`~moeforge.data.steps.base` (the interface, registry and runner),
:mod:`~moeforge.data.steps.read` (read, format), :mod:`~moeforge.data.steps.clean` (the record steps),
:mod:`~moeforge.data.steps.write` (the sink).
"""

from moeforge.data.steps.base import (
    STEPS,
    RecordStep,
    StageCount,
    Step,
    StepError,
    TaskContext,
    build_steps,
    check_steps,
    register,
    run_steps,
)
from moeforge.data.steps.clean import DecontamStep, FiltersStep, IdentityStep, LangIdStep, PiiStep
from moeforge.data.steps.read import FormatStep, ReadStep, Sourced
from moeforge.data.steps.write import WriteStep

__all__ = [
    "STEPS",
    "DecontamStep",
    "FiltersStep",
    "FormatStep",
    "IdentityStep",
    "LangIdStep",
    "PiiStep",
    "ReadStep",
    "RecordStep",
    "Sourced",
    "StageCount",
    "Step",
    "StepError",
    "TaskContext",
    "WriteStep",
    "build_steps",
    "check_steps",
    "register",
    "run_steps",
]
