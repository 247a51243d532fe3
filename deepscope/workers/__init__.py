"""Workers: RQ job functions and start-up; load model + data, call analysis, render, store."""
