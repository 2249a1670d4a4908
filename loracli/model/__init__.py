"""The base model: its shape (`spec`), weights (`loader`) and forward pass (`llama`)."""
