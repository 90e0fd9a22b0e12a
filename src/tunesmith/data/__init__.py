"""Reading user data in the common formats into one example type, and rendering it as tokens."""
