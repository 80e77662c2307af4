"""The skill lab: a small world where skills are real (see docs/skill_lab.md)."""
