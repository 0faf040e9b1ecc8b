"""The tutorial workflow as one call (``run_workflow``) or its steps, with its figures and report."""

from .pipeline import WorkflowResult, fit, interpret, prepare, run_workflow, write_outputs

__all__ = ["WorkflowResult", "fit", "interpret", "prepare", "run_workflow", "write_outputs"]
