<?php
// v1 of a package's phone-home behaviour: what `sandbox report` summarises.
function ping($host, $port) {
    $s = @fsockopen($host, $port, $errno, $errstr, 2);
    if ($s) { fclose($s); }
    return (bool) $s;
}
ping('203.0.113.7', 80);                                     // allowed
ping('198.51.100.9', 443);                                   // blocked (telemetry)
$page = @file_get_contents('http://www.inet.test/');         // allowed by name
$api = gethostbyname('api.inet.test');                       // refused by the resolver
// A helper process with a hostile name: guest text is attacker input.
$evil = "/tmp/<script>alert(1)</script>\x1b[31m";
@mkdir(dirname($evil), 0700, true);
copy(PHP_BINARY, $evil);
chmod($evil, 0700);
passthru(escapeshellarg($evil) . ' -n -r ' . escapeshellarg('@fsockopen("198.51.100.9", 80, $e, $s, 2);'));
echo "done\n";
