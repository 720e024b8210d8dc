<?php
// Concurrent requests through Symfony's CurlHttpClient (Debian's php-symfony-http-client).
require '/usr/share/php/Symfony/Component/HttpClient/autoload.php';

$client = Symfony\Component\HttpClient\HttpClient::create(['timeout' => 5]);
$responses = [];
foreach (['http://203.0.113.7/symfony/allowed', 'http://198.51.100.9/symfony/blocked',
          'http://www.inet.test/symfony/named'] as $url) {
    $responses[] = $client->request('GET', $url);
}
foreach ($responses as $response) {
    try {
        echo $response->getInfo('url'), ' ', $response->getStatusCode(), "\n";
    } catch (Throwable $error) {
        echo $response->getInfo('url'), ' failed: ', get_class($error), "\n";
    }
}
