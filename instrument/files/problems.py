"""The one error of a bad attribution file, raised deep in a reader and reported by `load` with the path.

expect(isinstance(document, dict), "'info' must be an object")   # raises InvalidFile otherwise
# load() turns it into ValueError(f"{path}: 'info' must be an object")
"""


class InvalidFile(Exception):
    """A problem found in a file; `load` reports it as `ValueError(f"{path}: {problem}")`."""


def expect(condition: bool, problem: str) -> None:
    """Raises `InvalidFile(problem)` unless `condition` holds."""
    if not condition:
        raise InvalidFile(problem)
