"""Child programs of the launch side that need torch, DeepSpeed or transformers (the launch side
never imports them): `python -m harness.jobs.<name>`, started and read by harness/launch/jobs.py.

    ds_check.py      DeepSpeed's own config class on each generated config
    model_facts.py   the model and tokenizer facts the plan checks need, and the model's parameter table
    param_table.py   the parameter table of the model with an adapter applied (both built on the meta device)
    reshard.py       a checkpoint made loadable at another topology (universal or consolidated)
    store_builder.py one token store, tokenized from the data files
"""
