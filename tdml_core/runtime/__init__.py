"""Pipeline-parallel, data-parallel training over torch.distributed."""
