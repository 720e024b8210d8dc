<?php
$greeting = "hello";
$n = strlen($greeting);
function twice(int $x): int {
    return $x * 2;
}
$m = twice($n);
echo "$greeting $m\n";
