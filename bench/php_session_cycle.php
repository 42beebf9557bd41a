<?php
// One PHP session handler's cycle, as bench/concurrency.py and bench/cpu.py compare
// it: session_start() (with a lock: the lock, then the read), a change,
// session_write_close() (the write, then the lock's release), N times in a row on one
// session. Prints one JSON line: wall and CPU (this process's) microseconds per cycle,
// and the session's storage key (so the caller can count its copies).
// php bench/php_session_cycle.php SAVE_PATH ITERATIONS HANDLER [INI=VALUE ...]
// HANDLER: session.save_handler, "memcached" (php-memcached) or "memcache" (pecl
// memcache); each INI=VALUE is set before the session starts, e.g.
// memcached.sess_locking=1 or memcache.session_redundancy=2.
[$script, $savePath, $iterations, $handler] = $argv;
ini_set('session.save_handler', $handler);
ini_set('session.save_path', $savePath);
foreach (array_slice($argv, 4) as $setting) {
    [$name, $value] = explode('=', $setting, 2);
    if (ini_set($name, $value) === false) {
        fwrite(STDERR, "cannot set $name\n");
        exit(2);
    }
}
ini_set('session.use_cookies', '0');
ini_set('session.cache_limiter', '');
ini_set('session.serialize_handler', 'php_serialize');

$id = 'bench' . getmypid() . bin2hex(random_bytes(8));
session_id($id);
session_start();
$_SESSION['history'] = str_repeat('/catalogue/item/000000', 90);  // about 2 KB
$_SESSION['n'] = 0;
session_write_close();

function cpu(): float {
    $usage = getrusage();
    return $usage['ru_utime.tv_sec'] * 1e6 + $usage['ru_utime.tv_usec']
        + $usage['ru_stime.tv_sec'] * 1e6 + $usage['ru_stime.tv_usec'];
}

$n = (int) $iterations;
$cpu = cpu();
$start = hrtime(true);
for ($i = 0; $i < $n; $i++) {
    session_start();
    $_SESSION['n'] = $i;
    session_write_close();
}
$wall = (hrtime(true) - $start) / 1e3 / $n;
$cpu = (cpu() - $cpu) / $n;
session_start();
$ok = $_SESSION['n'] === $n - 1 && strlen($_SESSION['history']) > 1000;
session_write_close();
echo json_encode(['wall_us' => $wall, 'cpu_us' => $cpu, 'ok' => $ok, 'key' => $id]), "\n";
