"""edgekit: safe early-exit VLMs for the edge."""
