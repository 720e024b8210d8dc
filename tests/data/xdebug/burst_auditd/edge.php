<?php
// Edge cases for the trace parser and the join: names, odd strings, a burst.
function connect_to(string $host, int $port)
{
    return @fsockopen($host, $port, $errno, $errstr, 1);
}
$weird = "tab\there\nnewline 'quote' \\ back \x01 ctrl \xff\xfe bytes ünï";
strlen($weird);
connect_to('phone.example', 80);
$t0 = microtime(true);
for ($i = 0; $i < 100; $i++) {
    connect_to('198.51.100.9', 80);
}
fwrite(STDERR, sprintf("burst: %.3f s\n", microtime(true) - $t0));
