"""Performance harness behind `klip bench`: measured numbers, never timed assertions."""
