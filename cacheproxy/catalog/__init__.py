"""What the proxy knows of each upstream database's schema: relations, their kinds and links, function volatility."""
