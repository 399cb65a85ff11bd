"""What runs the model: the sampler (rollouts), the trainer (the rectified update), one iteration
wired from params, the EMA of the trainable weights, and seeds shared by every rank."""
