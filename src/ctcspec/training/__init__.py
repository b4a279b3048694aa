"""Making drafters: self-distillation data (distill.py), batches and hidden states (data.py), the training
loop (train.py) and held-out acceptance (evaluate.py)."""
