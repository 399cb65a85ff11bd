"""The Wan 2.1 stack (`wan`: loading, saving, prompt encoding, decoding), LoRA and full fine-tuning
(`lora`), random stacks for tests and measurements (`random_stacks`), and the tokenizer built in
code (`tokenizer`)."""
