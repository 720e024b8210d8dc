<?php
// Exercises every network-capable call sandbox attribution must name.
$ctx = stream_context_create(['http' => ['timeout' => 2]]);

function phone_home(string $host): void
{
    $fp = @fsockopen($host, 80, $errno, $errstr, 2);
    if ($fp) {
        fclose($fp);
    }
}

class Client
{
    public function send(string $url): void
    {
        $s = @stream_socket_client($url, $errno, $errstr, 2);
        if ($s) {
            fclose($s);
        }
    }

    public static function fetch(string $url): void
    {
        $ch = curl_init($url);
        curl_setopt($ch, CURLOPT_RETURNTRANSFER, true);
        curl_setopt($ch, CURLOPT_CONNECTTIMEOUT, 2);
        curl_setopt($ch, CURLOPT_TIMEOUT, 2);
        curl_exec($ch);
        curl_close($ch);
    }
}

$fp = @fsockopen('203.0.113.7', 80, $errno, $errstr, 2);
$fp = @fsockopen('198.51.100.9', 80, $errno, $errstr, 2);
$s = @stream_socket_client('tcp://198.51.100.9:80', $errno, $errstr, 2);
@file_get_contents('http://203.0.113.7/', false, $ctx);
$h = @fopen('http://198.51.100.9/', 'r', false, $ctx);
Client::fetch('http://203.0.113.7/');
$sock = socket_create(AF_INET, SOCK_STREAM, SOL_TCP);
@socket_connect($sock, '198.51.100.9', 80);
socket_close($sock);
$ip = gethostbyname('phone.example');
$records = @dns_get_record('phone.example', DNS_A);
phone_home('198.51.100.9');
(new Client())->send('tcp://198.51.100.9:80');
$fp = @fsockopen('[2001:db8:1::9]', 80, $errno, $errstr, 2);
$lookup = function (string $name): string {
    return gethostbyname($name);
};
$lookup('other.example');
passthru(PHP_BINARY . ' ' . escapeshellarg(__DIR__ . '/child.php'));
echo "done\n";
