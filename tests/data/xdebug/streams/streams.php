<?php
// Non-blocking connects driven by stream_select, and an HTTP stream with a context.
$flags = STREAM_CLIENT_CONNECT | STREAM_CLIENT_ASYNC_CONNECT;
$sockets = [];
foreach (['tcp://203.0.113.7:80', 'tcp://198.51.100.9:80', 'tcp://www.inet.test:80'] as $target) {
    $socket = @stream_socket_client($target, $errno, $error, 5, $flags);
    if ($socket !== false) {
        $sockets[$target] = $socket;
    }
}
$deadline = microtime(true) + 3;
while ($sockets && microtime(true) < $deadline) {
    $read = $write = array_values($sockets);
    $except = null;
    if (stream_select($read, $write, $except, 0, 200000) > 0) {
        foreach ($sockets as $target => $socket) {
            if (in_array($socket, $write, true)) {
                echo $target, ' ready', "\n";
                unset($sockets[$target]);
            }
        }
    }
}
$context = stream_context_create(['http' => ['timeout' => 3, 'header' => "X-Probe: 1\r\n"]]);
@file_get_contents('http://198.51.100.9/context', false, $context);
