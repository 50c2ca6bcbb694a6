"""What combines curate with the trainer: the equal-budget study, InstructDiff's iterations, the demo. The only part of curate that imports train."""
