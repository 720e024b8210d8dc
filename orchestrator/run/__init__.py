"""Running the target software in the guest (target) and naming the PHP line behind each attempt
from its xdebug traces (xdebug)."""
