// Translation unit that owns the precompiled header shared by every neva target.
