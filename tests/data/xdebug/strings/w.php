<?php
$weird = "tab\there\nnewline 'quote' \\ back \x01 ctrl \xff\xfe bytes ünï";
md5($weird);
md5(str_repeat("y", 600));
