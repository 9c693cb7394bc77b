"""Building blocks shared by the LCM families (official module and state-dict names)."""
