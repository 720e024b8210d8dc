<?php
// Concurrent requests through Guzzle's curl_multi handler (Debian's php-guzzlehttp-guzzle).
require '/usr/share/php/GuzzleHttp/autoload.php';

$client = new GuzzleHttp\Client(['timeout' => 5, 'http_errors' => false]);
$promises = [
    'allowed' => $client->getAsync('http://203.0.113.7/guzzle/allowed'),
    'blocked' => $client->getAsync('http://198.51.100.9/guzzle/blocked'),
    'named' => $client->getAsync('http://www.inet.test/guzzle/named'),
];
foreach (GuzzleHttp\Promise\Utils::settle($promises)->wait() as $key => $result) {
    echo $key, ' ', $result['state'], "\n";
}
