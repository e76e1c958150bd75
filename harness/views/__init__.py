"""Reading a run folder for people: `harness status`, `harness report` and `compare`, and the tables
`harness plan` prints. Reads records only; never imports torch.

    status.py   where each stage of a run stands
    report.py   curves and tables of finished (or partly finished) runs
    tables.py   the console tables of `harness plan` and `harness status`
"""
