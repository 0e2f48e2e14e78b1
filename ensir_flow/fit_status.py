"""How each LUT cell got its weights: the values of a LUT's `fit_status` variable (CF flags)."""

from enum import IntEnum


class FitStatus(IntEnum):
    """One code per way a cell's weights were obtained; stored as int8, named by `FLAG_MEANINGS`."""

    EMPTY_FALLBACK = 0  # no reference pixels: the empty-cell policy's weights
    INITIAL_WEIGHTS = 1  # fewer pixels than EM needs: the initial weights
    EM = 2  # fitted by EM
    EM_FAILED_INITIAL_WEIGHTS = 3  # EM abandoned (as the reference code does): the initial weights
    LEAST_SQUARES = 4  # fitted by the lsq solver
    UNIFORM = 5  # 1/K by construction (average, zzpm)
    IMPORTED = 6  # read from a LUT published by the paper's code
    SELECTED = 7  # the cell's model of least squared error (select)


#: The CF `flag_meanings` attribute: the codes' names in code order.
FLAG_MEANINGS = " ".join(status.name.lower() for status in FitStatus)
