<?php
// Runs until killed: its trace ends without a footer.
function again(int $i): void
{
    @fsockopen('198.51.100.9', 80, $errno, $errstr, 1);
    usleep(200000);
}
for ($i = 0; ; $i++) {
    again($i);
}
