"""The training loop and what it keeps: resume, metrics, pre-emption, read-ahead, schedule,
evaluation, and the layout and compilation of the networks it trains."""
