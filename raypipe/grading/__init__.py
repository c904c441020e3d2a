"""Answer extraction and grading: the single source of truth for what counts as a correct answer."""

from raypipe.grading.answers import KINDS, GradeResult, extract_answer, grade, is_equivalent, last_boxed

__all__ = ["KINDS", "GradeResult", "extract_answer", "grade", "is_equivalent", "last_boxed"]
