<?php
// v1 of a package's phone-home behaviour: what `sandbox report` summarises.
function ping($host, $port) {
    $s = @fsockopen($host, $port, $errno, $errstr, 2);
    if ($s) { fclose($s); }
    return (bool) $s;
}
ping('203.0.113.7', 80);                                     // allowed
// v2 no longer phones home on 443
$page = @file_get_contents('http://www.inet.test/');         // allowed by name
$u = stream_socket_client('udp://198.51.100.9:5353'); fwrite($u, 'hello');  // new: UDP
// A helper process with a hostile name: guest text is attacker input.
$evil = "/tmp/<script>alert(1)</script>\x1b[31m";
@mkdir(dirname($evil), 0700, true);
copy(PHP_BINARY, $evil);
chmod($evil, 0700);
passthru(escapeshellarg($evil) . ' -n -r ' . escapeshellarg('@fsockopen("198.51.100.9", 80, $e, $s, 2);'));
echo "done\n";
