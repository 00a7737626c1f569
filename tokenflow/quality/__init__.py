"""Quality of an edit: temporal-consistency metrics, CLIP scores, visual reports."""
