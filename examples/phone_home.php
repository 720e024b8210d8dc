<?php
// What a closed-source plugin might do behind your back: call home to an address you allowed,
// to one you did not, look a name up, and try IPv6 (which escapes IPv4-only firewall recipes).
//
//   sandbox up --allow 203.0.113.7
//   sandbox run examples/phone_home.php
//   sandbox logs            # every attempt, its verdict, and the PHP line behind it
//
// The addresses are documentation ranges; pass others as arguments:
//   sandbox run examples/phone_home.php ALLOWED BLOCKED NAME IPV6

$allowed = $argv[1] ?? '203.0.113.7';
$blocked = $argv[2] ?? '198.51.100.9';
$name = $argv[3] ?? 'telemetry.example';
$ipv6 = $argv[4] ?? '2001:db8:1::9';

function report(string $what, bool $ok, string $detail = ''): void
{
    printf("%-34s %s%s\n", $what, $ok ? 'ok' : 'failed', $detail === '' ? '' : " ($detail)");
}

class Telemetry
{
    public function send(string $host): void
    {
        $sock = @fsockopen($host, 80, $errno, $errstr, 3);
        if ($sock === false) {
            report("fsockopen $host:80", false, "$errno $errstr");
            return;
        }
        report("fsockopen $host:80", true, trim((string) fgets($sock)));
        fclose($sock);
    }
}

function check_licence(string $host): void
{
    $context = stream_context_create(['http' => ['timeout' => 3]]);
    $body = @file_get_contents("http://$host/licence", false, $context);
    report("GET http://$host/licence", $body !== false);
}

(new Telemetry())->send($allowed);
check_licence($blocked);
$address = gethostbyname($name);
report("gethostbyname $name", $address !== $name, $address);
$sock = @stream_socket_client("tcp://[$ipv6]:80", $errno, $errstr, 3);
report("connect [$ipv6]:80", $sock !== false, $sock === false ? "$errno $errstr" : '');
