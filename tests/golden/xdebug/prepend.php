<?php
// Written by `sandbox up`: code coverage of each process of a `sandbox run --xdebug coverage`,
// dumped as JSON into the run's xdebug output directory when the process ends.
(static function (): void {
    if (!function_exists('xdebug_start_code_coverage')) {
        return;
    }
    xdebug_start_code_coverage(XDEBUG_CC_UNUSED | XDEBUG_CC_DEAD_CODE);
    register_shutdown_function(static function (): void {
        register_shutdown_function(static function (): void {
            $coverage = xdebug_get_code_coverage();
            xdebug_stop_code_coverage();
            unset($coverage[__FILE__]);
            $name = sprintf(
                '%s/coverage.%d.%s.json',
                ini_get('xdebug.output_dir'),
                getmypid(),
                bin2hex(random_bytes(3))
            );
            @file_put_contents($name, json_encode($coverage, JSON_UNESCAPED_SLASHES));
        });
    });
})();
