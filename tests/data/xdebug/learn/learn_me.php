<?php
// What `sandbox run --learn` learns and `sandbox policy suggest` turns into a policy
// (tests/test_e2e_learn.py). Every call prints one line: "NAME ok" or "NAME failed".
// An extra argument HOST:PORT makes one more TCP call, one the learning run did not make.

function tcp(string $label, string $target): void
{
    $socket = @stream_socket_client("tcp://$target", $errno, $errstr, 5);
    if ($socket === false) {
        echo "$label failed ($errno)\n";
        return;
    }
    fwrite($socket, "GET / HTTP/1.0\r\nHost: www.inet.test\r\n\r\n");
    fclose($socket);
    echo "$label ok\n";
}

function udp(string $label, string $target): void
{
    $socket = @stream_socket_client("udp://$target", $errno, $errstr, 5);
    if ($socket === false || @fwrite($socket, "hello") === false) {
        echo "$label failed\n";
        return;
    }
    fclose($socket);
    echo "$label sent\n";
}

tcp("name", "www.inet.test:80");
tcp("address", "203.0.113.7:443");
udp("udp", "198.51.100.9:5353");
if (isset($argv[1])) {
    tcp("extra", $argv[1]);
}
