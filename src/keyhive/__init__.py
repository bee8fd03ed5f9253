"""keyhive: one live asyncio agent per key."""
