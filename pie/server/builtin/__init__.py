"""Built-in inferlets the server registers at start (shipped as package data, built on first use)."""
