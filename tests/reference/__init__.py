"""Independent float64 oracles, written as plain scalar loops straight from each op's formula
(numba-jitted so that large random cases stay fast). They share no code with fastnorm."""
