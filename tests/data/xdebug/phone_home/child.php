<?php
// A child PHP process: its own pid, its own trace.
$fp = @fsockopen('198.51.100.9', 443, $errno, $errstr, 2);
echo "child done\n";
