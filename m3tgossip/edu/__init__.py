"""The education workload and all of m3tgossip that needs torch, PEFT, transformers or scikit-learn.

- `data`: the record schema, the built-in multi-modal generator, the OULAD loader;
- `model`: the M3T model a node trains and the components it shares;
- `train`: the optimiser loop and the evaluation metrics;
- `mia`: the membership-inference audit;
- `workload`: `EduWorkload`, the daemon's side of all this.
"""
